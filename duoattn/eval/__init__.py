"""Evaluation on the exact deployment path: every method runs ``model.generate`` with the cache and kernels that
``duo_attention`` deploys."""
