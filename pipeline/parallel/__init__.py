"""How the warm pool spreads one job over its GPUs; must not change the math (each layout equals one GPU).

* ulysses.py: sequence parallelism. Every rank holds 1/P of the tokens; attention swaps to 1/P of the heads
  (all_to_all). P must divide the 40 heads: 1, 2, 4, 5, 8 GPUs work (also 10, 20, 40); 3, 6, 7 do not.
* cfg.py: CFG-parallel. Half the ranks run the conditional branch, half the unconditional, each half with
  Ulysses inside; the velocities are swapped every step. Needs an even GPU count and Ulysses size P/2
  dividing 40: 2, 4, 8, 10 GPUs (6 does not: 3 does not divide 40).
* sharding.py: weights replicated when they fit the smallest free GPU memory, else FSDP2 shards per
  block (several GPUs) or, on one GPU, the idle expert in host memory (the reference's behaviour).
* vae_decode.py: the VAE decode as a pipeline over decoder layers across the ranks (exact).
* families.py: the model families (I2V-A14B, Animate-14B) as the pool loads and runs them.
"""
