"""Machine-learning models: torchvision architectures, building nets, artifacts (safetensors + card), the registry."""
