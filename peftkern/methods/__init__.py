"""One module per PEFT method: its config (Hugging Face PEFT's field names), the module that
wraps a target layer, merge/unmerge and its state-dict naming."""
