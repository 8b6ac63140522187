"""Triton kernels. Importing this package needs triton; lowbit.ops imports it lazily."""
