"""Plug-ins for other tools: lmms-eval (``lmms_eval``, optional extra ``vtprune[lmms-eval]``)."""
