"""The method: backbone (+ the embedded default), soft prompts, prompt injection, heads, freezing,
alignment losses, and TransferModel, which composes them."""
