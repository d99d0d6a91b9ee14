"""Models: the Hugging Face model factory, FLOPs per token and complete model folders
(`factory`), safetensors checkpoints with a sha256 and the training state (`checkpoint`), device
peaks for MFU (`hardware`), and LoRA adapter experts on a frozen base through PEFT (`adapters`).
Builds on `data` only for token ids; knows nothing of training."""
