"""Fine-tuning: contrastive embedder training (InfoNCE, GradCache, DDP, LoRA) and reranker SFT."""
