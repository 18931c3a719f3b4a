"""The garbage taxonomy: one source of truth for the 26 classes and the 4 bins.

Class index order is the sorted folder code: `00_00` -> 0, `00_01` -> 1, ...
`03_03` -> 25. The first two digits of the code decide the bin; the course
notebook's own dictionaries contradict each other, the folder code wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bin:
    code: str
    english: str
    chinese: str


BINS: dict[str, Bin] = {
    "00": Bin("00", "recyclable", "可回收物"),
    "01": Bin("01", "residual (dry)", "干垃圾"),
    "02": Bin("02", "hazardous", "有害垃圾"),
    "03": Bin("03", "kitchen (wet)", "湿垃圾"),
}


@dataclass(frozen=True)
class GarbageClass:
    index: int
    code: str
    english: str
    chinese: str

    @property
    def bin(self) -> Bin:
        return BINS[self.code[:2]]

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "code": self.code,
            "english": self.english,
            "chinese": self.chinese,
            "bin": self.bin.english,
            "bin_chinese": self.bin.chinese,
            "bin_code": self.bin.code,
        }


_NAMES = {
    "00_00": ("plastic bottle", "塑料瓶"),
    "00_01": ("hat", "帽子"),
    "00_02": ("newspaper", "报纸"),
    "00_03": ("can", "易拉罐"),
    "00_04": ("glassware", "玻璃制品"),
    "00_05": ("glass bottle", "玻璃瓶"),
    "00_06": ("cardboard", "硬纸板"),
    "00_07": ("basketball", "篮球"),
    "00_08": ("paper", "纸张"),
    "00_09": ("metal object", "金属制品"),
    "01_00": ("disposable chopsticks", "一次性筷子"),
    "01_01": ("lighter", "打火机"),
    "01_02": ("broom", "扫把"),
    "01_03": ("old mirror", "旧镜子"),
    "01_04": ("toothbrush", "牙刷"),
    "01_05": ("dirty clothes", "脏污衣服"),
    "01_06": ("seashell", "贝壳"),
    "01_07": ("ceramic bowl", "陶瓷碗"),
    "02_00": ("paint bucket", "油漆桶"),
    "02_01": ("battery", "电池"),
    "02_02": ("fluorescent lamp", "荧光灯"),
    "02_03": ("pills and capsules", "药片胶囊"),
    "03_00": ("orange peel", "橙皮"),
    "03_01": ("vegetable leaves", "菜叶"),
    "03_02": ("eggshell", "蛋壳"),
    "03_03": ("banana peel", "香蕉皮"),
}

CLASSES: tuple[GarbageClass, ...] = tuple(
    GarbageClass(index, code, *_NAMES[code]) for index, code in enumerate(sorted(_NAMES))
)
CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)
NUM_CLASSES = len(CLASSES)
BY_CODE: dict[str, GarbageClass] = {c.code: c for c in CLASSES}


def bin_index(class_index: int) -> int:
    """0..3: the bin of a class index (recyclable, residual, hazardous, kitchen)."""
    return int(CLASSES[class_index].code[:2])


def labels_payload() -> list[dict[str, object]]:
    return [c.as_dict() for c in CLASSES]


def read_label_file(path: Path) -> dict[str, str]:
    """Parse a course `label.txt` (`<chinese name>: <code>` per line), UTF-8 or GBK."""
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "gbk"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ValueError(f"{path} is neither UTF-8 nor GBK text")
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line and "：" not in line:
            continue
        name, _, code = line.replace("：", ":").partition(":")
        entries[code.strip()] = name.strip()
    return entries


def compare_label_file(path: Path) -> list[str]:
    """Disagreements between a `label.txt` and the built-in taxonomy, as sentences."""
    problems = []
    entries = read_label_file(path)
    for code, name in sorted(entries.items()):
        if len(code) == 2:
            if code in BINS and BINS[code].chinese != name:
                problems.append(f"bin {code} is '{name}' in {path.name}, '{BINS[code].chinese}' built in")
            continue
        known = BY_CODE.get(code)
        if known is None:
            problems.append(f"{path.name} names class {code} ('{name}'), which is not in the taxonomy")
        elif known.chinese != name:
            problems.append(f"class {code} is '{name}' in {path.name}, '{known.chinese}' built in")
    for code in CODES:
        if code not in entries:
            problems.append(f"{path.name} does not list class {code} ({BY_CODE[code].chinese})")
    return problems
