"""Model building blocks: attention, layers, the shared encoder, modality adapters, heads, the model."""
