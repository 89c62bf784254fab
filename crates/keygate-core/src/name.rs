//! Display names (of keys, OAuth clients, tenants, users): text a person reads in the dashboard,
//! a consent page, a log line or a terminal. A name may hold any printable character, but no
//! control character (a NUL truncates it in C tools and PostgreSQL refuses it; an escape
//! sequence drives a terminal) and no bidirectional control, which would make a name display
//! as something other than what it is (`U+202E` turns `key_gpj.exe` into `key_exe.jpg`).

/// Whether `c` may not appear in a display name: a control character (Unicode general
/// category Cc), a format character (Cf: the bidirectional controls, zero-width spaces, the
/// soft hyphen, the byte-order mark, tag characters), a line or paragraph separator (Zl, Zp),
/// or a Hangul filler — everything that is invisible or changes how the text around it shows,
/// so `prod\u{200B}` cannot pass for `prod`. The zero-width joiner and non-joiner (U+200C,
/// U+200D) stay: emoji sequences and several scripts need them.
pub fn is_forbidden_in_name(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Cf, as of Unicode 15.1, without U+200C and U+200D.
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
                // Zl, Zp.
                | '\u{2028}'
                | '\u{2029}'
                // Hangul fillers (Lo, but blank).
                | '\u{115F}'
                | '\u{1160}'
                | '\u{3164}'
                | '\u{FFA0}'
        )
}

/// Why `name` may not be a display name, if it may not: it holds a character that
/// [`is_forbidden_in_name`] refuses. Length and blankness are the caller's rules.
pub fn name_problem(name: &str) -> Option<&'static str> {
    name.chars().any(is_forbidden_in_name).then_some(
        "name must not contain control characters, bidirectional controls or invisible \
             characters",
    )
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
            "prod\u{200B}",
            "\u{FEFF}prod",
            "a\u{2028}b",
            "a\u{2029}b",
            "soft\u{00AD}hyphen",
            "tag\u{E0041}",
            "\u{3164}",
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
