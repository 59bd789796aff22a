"""SmallThinker: sparse on-device language models (model, training, evaluation, offloaded inference)."""
