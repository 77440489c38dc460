"""Evaluation: score a version on instruction sets (`evaluate`) and turn the scores of a sequence of stages into
the continual-learning metrics of the paper (`metrics`: the accuracy matrix, Avg.ACC, Forgetting, BWT)."""
