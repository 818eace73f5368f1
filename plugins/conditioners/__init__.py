"""Built-in conditioners: class labels, captions (word tokens), a frozen text encoder."""
