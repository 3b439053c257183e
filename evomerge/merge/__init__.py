"""The merge engine: kernels, planning, materializing, writing.

Importing a subpackage binds it as an attribute of its parent, so once anything has imported
``evomerge.merge.*`` the name ``evomerge.merge`` is this package, not the API function
``evomerge.api.merge``. Calling the package calls that function, so ``evomerge.merge(recipe,
out_dir)`` works either way.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
