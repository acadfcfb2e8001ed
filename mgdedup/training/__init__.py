"""MultiGrain training (docs/multigrain.md, section 2).

The math core is pure tensor code without I/O: the repeated-augmentation batch sampler
(`sampler`), the distance-weighted margin loss (`margin_loss`) and the joint objective
(`objective`). Submodules are imported explicitly so importing this package stays cheap.
"""
