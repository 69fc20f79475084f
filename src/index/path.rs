//! PATH checks: an index entry's PATH is placed under the mount point, so anything that could
//! escape it or confuse the tree is refused here, before the namespace sees it.

const MAX_PATH_BYTES: usize = 1024;
const MAX_COMPONENT_BYTES: usize = 255;

/// Refuses any PATH that could escape the mount or confuse the tree.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.starts_with('/') {
        return Err("absolute".into());
    }
    if path.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    for component in path.split('/') {
        match component {
            "" => return Err("empty component".into()),
            "." | ".." => return Err(format!("`{component}` component")),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(format!("component longer than {MAX_COMPONENT_BYTES} bytes"));
            }
            _ => {}
        }
    }
    if path == "Packages" {
        return Err("collides with the index file itself".into());
    }
    Ok(())
}
