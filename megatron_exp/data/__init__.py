"""Text corpora -> tokenizer -> a cached, memory-mapped token stream per split -> GPT training samples."""
