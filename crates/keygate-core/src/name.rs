//! Display names (of keys, OAuth clients, tenants, users): text a person reads in the dashboard,
//! a consent page, a log line or a terminal. A name may hold any printable character, but no
//! control character (a NUL truncates it in C tools and PostgreSQL refuses it; an escape
//! sequence drives a terminal) and no bidirectional control, which would make a name display
//! as something other than what it is (`U+202E` turns `key_gpj.exe` into `key_exe.jpg`).

/// Whether `c` may not appear in a display name: a control character (Unicode general
/// category Cc) or a bidirectional formatting control (the Arabic letter mark, the LRM/RLM
/// marks, the embeddings and overrides U+202A–U+202E, the isolates U+2066–U+2069).
pub fn is_forbidden_in_name(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// Why `name` may not be a display name, if it may not: it holds a character that
/// [`is_forbidden_in_name`] refuses. Length and blankness are the caller's rules.
pub fn name_problem(name: &str) -> Option<&'static str> {
    name.chars()
        .any(is_forbidden_in_name)
        .then_some("name must not contain control characters or bidirectional controls")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_controls_and_bidi_controls() {
        for bad in [
            "a\0b",
            "tab\there",
            "line\n",
            "\u{7f}",
            "\u{85}next line",
            "\u{9b}31m",
            "key_\u{202E}gpj.exe",
            "\u{202A}",
            "\u{202B}",
            "\u{202C}",
            "\u{202D}",
            "\u{2066}x\u{2069}",
            "\u{2067}",
            "\u{2068}",
            "\u{200E}",
            "\u{200F}",
            "\u{061C}",
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn accepts_printable_names_in_any_script() {
        for good in [
            "production",
            "Prod key (EU) #2",
            "Zoë's widget",
            "مفتاح الإنتاج",
            "שלום",
            "生产密钥",
            "🔑 deploy",
            // Joiners are not bidi controls: emoji sequences and Indic scripts need them.
            "👩\u{200D}💻",
            "क्\u{200C}ष",
        ] {
            assert_eq!(name_problem(good), None, "{good:?}");
        }
    }

    proptest! {
        /// The rule is exactly "no forbidden character": a name of allowed characters passes,
        /// and one forbidden character anywhere fails it.
        #[test]
        fn one_forbidden_character_anywhere_is_refused(
            s in "\\PC{0,40}",
            at in 0usize..41,
            bad in prop_oneof![
                (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap_or('\0')),
                (0x7fu32..0xa0).prop_map(|c| char::from_u32(c).unwrap_or('\0')),
                prop::sample::select(vec![
                    '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}',
                    '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
                ]),
            ],
        ) {
            let clean: String = s.chars().filter(|c| !is_forbidden_in_name(*c)).collect();
            prop_assert_eq!(name_problem(&clean), None);
            let mut chars: Vec<char> = clean.chars().collect();
            let at = at.min(chars.len());
            chars.insert(at, bad);
            let dirty: String = chars.into_iter().collect();
            prop_assert!(name_problem(&dirty).is_some());
        }
    }
}
