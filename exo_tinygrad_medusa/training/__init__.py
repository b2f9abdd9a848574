"""Training Medusa heads by self-distillation: generate the model's own answers, store its hidden states once,
train the heads on them, evaluate accuracy and accepted length."""
