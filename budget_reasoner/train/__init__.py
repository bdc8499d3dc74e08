"""Training stages: thin wrappers over TRL trainers (sft, dpo, distill) and the offline bootstrap."""
