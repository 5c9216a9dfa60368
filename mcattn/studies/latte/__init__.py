"""Studies of LATTE (:mod:`mcattn.latte`): its comparison entry and evaluations."""
