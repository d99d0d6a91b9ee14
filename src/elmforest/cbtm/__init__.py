"""c-BTM (Gururangan et al. 2023): domains discovered without labels. tf-idf document vectors
(`tfidf`), size-balanced k-means (`balanced_kmeans`), clustering a corpus into cluster-domains
(`cluster`) and routing text to the experts by its distance to the cluster centres
(`cluster_router`)."""
