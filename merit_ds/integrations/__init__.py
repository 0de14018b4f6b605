"""Glue to the tools people launch with (DeepSpeed; HF Trainer and Accelerate elsewhere). No math."""
