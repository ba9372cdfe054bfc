"""grpo: train language models with GRPO (Group Relative Policy Optimization) from the command line."""

__version__ = "0.1.0"
