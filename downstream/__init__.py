"""Downstream-accuracy probes (lm-evaluation-harness, in-process), installed as `seqedit.downstream`."""
