"""Studies of eigenbasis attention (:mod:`mcattn.eigen`): its comparison entry and evaluations."""
