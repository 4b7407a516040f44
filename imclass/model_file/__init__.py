"""The model-file format, on the ground floor: ``format`` reads and writes one ``.safetensors`` file
(header, atomic write, checked read), ``save`` describes an object duck-typed. Rebuilding an object
from a file needs the model classes and lives above, in ``imclass.models.rebuild``."""
