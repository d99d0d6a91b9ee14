"""Models: the Hugging Face model factory, FLOPs per token and complete model folders
(`factory`), safetensors checkpoints with a sha256 and the training state (`checkpoint`), and device
peaks for MFU (`hardware`). Builds on `data` only for token ids; knows nothing of training."""
