"""``mg3d.student``: the mobile neural light field (NeLF) student, its ray sampling and encoding, pseudo data
from the teacher and student training. Imported only by the stages that use it (it needs torch)."""
