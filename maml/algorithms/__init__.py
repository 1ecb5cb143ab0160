"""The MAML family as values of one meta-gradient module (exported from `maml`):

- `base`: `AbstractStrategy`, the hooks every member implements;
- `order`: `SecondOrder` (MAML), `FirstOrder` (FOMAML), `AnnealedOrder` (MAML++ derivative-order annealing);
- `multistep`: `MultiStepLoss` and `msl_weights` (MAML++), `cosine_adam` (its outer optimiser);
- `learned_rates`: `LearnedLR` (Meta-SGD per parameter, MAML++ LSLR per layer and step);
- `reptile`: `Reptile` and its outer update `reptile_sgd`;
- `implicit`: `Implicit` (iMAML: conjugate gradient on Hessian-vector products);
- `anil`: `head_filter` (ANIL: only the head adapts).
"""
