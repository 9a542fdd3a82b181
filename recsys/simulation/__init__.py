"""Simulated A/B testing: the statistics of an experiment (``stats``), its power analysis (``power``) and
off-policy evaluation of a target policy on logged impressions (``off_policy``)."""
