"""Studies of random-feature attention (:mod:`mcattn.rfa`): its comparison entry and evaluations."""
