"""Open-Llama: the one training loop shared by pretraining, SFT and DPO."""
