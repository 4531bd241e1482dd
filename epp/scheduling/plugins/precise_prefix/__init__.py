"""Precise prefix-cache routing from the engines' KV events: `scorer` (the plugin), `index`, `tokenize`."""
