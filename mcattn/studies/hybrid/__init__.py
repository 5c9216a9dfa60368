"""Studies of hybrid attention (:mod:`mcattn.hybrid`): its comparison entry."""
