"""Fine-tuning, evaluation, prediction and archiving of torchvision image classifiers."""
