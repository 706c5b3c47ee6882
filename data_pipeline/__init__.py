"""Streaming data for self-supervised pretraining: shard writing, fsspec-opened
WebDataset shards, decoding, per-modality transforms and resumable streams."""
