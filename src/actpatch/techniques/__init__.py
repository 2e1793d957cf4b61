"""The techniques, each one module on top of the experiment core: exact patching (``patching``),
named positions (``positions``), attribution patching and AtP* (``attribution``, ``graddrop``),
path patching (``path``), edge attribution and circuits (``graph``, ``eap``, ``circuit``)."""
