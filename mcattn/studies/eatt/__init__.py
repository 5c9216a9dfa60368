"""Studies of E-Att (:mod:`mcattn.eatt`): its comparison entry and evaluations."""
