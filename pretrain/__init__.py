"""Self-supervised pretraining of Vision Transformers (MAE, DINOv2, VideoMAE-V2) on DeepSpeed."""
