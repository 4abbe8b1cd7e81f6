import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# ../shared/golden from the repository root, as tests/CMakeLists.txt has it; $MNEMO_GOLDEN_DIR overrides.
GOLDEN_DIR = Path(os.environ.get("MNEMO_GOLDEN_DIR") or Path(__file__).resolve().parents[2] / ".." / "shared" / "golden")
