"""Fine-tuning embedders with contrastive or triplet loss: `config` (options, light), `objective`
(losses and miners), `loop` (data, evaluation, the epoch loop and the run directory)."""
