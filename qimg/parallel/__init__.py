"""One image on several processes under torchrun (--cfg-parallel, --ulysses, --tp): layout.py checks a layout
(light, no torch), group.py runs the ranks, ulysses.py and tensor.py split the transformer's work. Below the
engine, above the model: the model's hooks are AttentionPlan.exchange and its attention counting heads by the
head size (a tensor-parallel rank holds heads / tp of them)."""
