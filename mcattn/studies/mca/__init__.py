"""Studies of MCA (:mod:`mcattn.mca`): its comparison entry and evaluations."""
