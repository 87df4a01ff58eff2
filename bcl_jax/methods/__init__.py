"""The field's baseline compatibility methods (LCE, UniBCT, Hot-refresh/RACT, AdvBCT) as pure functions."""
