"""The training objectives: PoGDiff (Eq. 13) with its neighbours (Eq. 8) and weights psi (Eqs. 9, 11, 12),
and the baselines."""
