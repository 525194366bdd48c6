//! Test programs written in C (`tests/programs/*.c`), compiled on demand with
//! the system C compiler into `target/dvk-test-programs/`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static COMPILE: Mutex<()> = Mutex::new(());

/// Compiles `tests/programs/<name>.c` (if newer than the binary) and returns the binary.
pub fn c_program(name: &str) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("programs").join(format!("{name}.c"));
    let out_dir = crate::bin_dir().join("dvk-test-programs");
    let bin = out_dir.join(name);
    let _guard = COMPILE.lock().unwrap_or_else(|p| p.into_inner());
    // Rebuilt when the source or any header next to it is newer than the binary.
    let newest_source = std::fs::read_dir(src.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path() == src || e.path().extension().is_some_and(|x| x == "h"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    let fresh = match (newest_source, std::fs::metadata(&bin).and_then(|b| b.modified())) {
        (Some(s), Ok(b)) => b >= s,
        _ => false,
    };
    if !fresh {
        std::fs::create_dir_all(&out_dir).unwrap();
        let tmp = out_dir.join(format!(".{name}.{}", std::process::id()));
        let out = Command::new("cc")
            .args(["-O2", "-Wall", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .expect("run cc (apt-get install gcc)");
        assert!(out.status.success(), "cc {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
        std::fs::rename(&tmp, &bin).unwrap();
    }
    bin
}

/// The system Python 3 (not a pyenv shim script), for tests that need a real
/// interpreter binary as the preloaded process.
pub fn python3() -> PathBuf {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "python3".into()
}
