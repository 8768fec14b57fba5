"""What a finished run becomes: inference, merged and adapter exports, GGUF, Ollama, lm-eval."""
