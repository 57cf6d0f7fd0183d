"""The embedded synthetic world (generator, tokenizer, tiny GPT-2), built on first use and cached."""
