"""Safety classifier tooling: training, evaluation and distillation commands, and model files."""
