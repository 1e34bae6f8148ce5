"""Training of the shipped models from a seed (``python -m fastdiff.models.train`` is the command
line); the model definitions they train live in fastdiff.models."""
