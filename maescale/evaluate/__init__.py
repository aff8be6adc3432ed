"""Evaluation protocols of a pretrained encoder: linear probe, kNN and fine-tuning."""
