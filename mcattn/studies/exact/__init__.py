"""Studies of exact attention (:mod:`mcattn.exact`): its comparison entry and evaluations."""
