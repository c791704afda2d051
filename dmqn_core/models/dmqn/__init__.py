"""DMQN (SIGIR '25) as the paper names its parts: MCQM (mcqm.py, eq. 3-10; its fused training path
fused_mcqm.py, tested against the plain mcqm_reference.py), ICIM (icim.py, eq. 11-13), CTAM (ctam.py)
and the model (model.py)."""
